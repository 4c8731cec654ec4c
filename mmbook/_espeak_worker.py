"""espeak-ng worker process for :mod:`mmbook.speech` (imports only NumPy, for a fast start).

Reads a JSON list of jobs on stdin, initialises espeak-ng once, forks a child per job so that
every utterance starts from the same pristine engine state, and writes an ``.npz`` of int16
arrays (``a0``, ``a1``, ...) at 22050 Hz to stdout. Run by path, never imported.
"""

import ctypes
import io
import json
import os
import sys

import numpy as np

ESPEAK_SAMPLE_RATE = 22050
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 2, 3, 4


def _worker() -> int:
    import espeakng_loader

    jobs = json.loads(sys.stdin.buffer.read())
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    libc = ctypes.CDLL(None)
    rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2 = SYNCHRONOUS, no thread
    if rate != ESPEAK_SAMPLE_RATE:
        sys.stderr.write(f"espeak-ng initialisation failed (returned {rate})\n")
        return 1
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def collect(wav, num_samples, events):
        if num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    results = {}
    for i, job in enumerate(jobs):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: pristine engine state, speak once, send the samples, exit
            os.close(read_fd)
            status = 0
            # Breathy and whispered voices draw noise from the C library's rand(), seeded from the
            # clock at start-up; a fixed seed makes them reproducible too.
            libc.srand(0)
            if hasattr(lib, "espeak_ng_SetRandSeed"):
                lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
            if lib.espeak_SetVoiceByName(job["voice"].encode()) != 0:
                status = 2
            for param, value in ((_ESPEAK_RATE, job["rate"]), (_ESPEAK_PITCH, job["pitch"]),
                                 (_ESPEAK_RANGE, job["pitch_range"]), (_ESPEAK_VOLUME, 100)):
                lib.espeak_SetParameter(param, value, 0)
            data = job["text"].encode("utf-8")
            if status == 0:
                status = 3 if lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None) != 0 else 0
                lib.espeak_Synchronize()
            payload = np.concatenate(chunks).astype(np.int16).tobytes() if chunks else b""
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
            os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as inp:
            payload = inp.read()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 2:
            sys.stderr.write(f"espeak-ng does not know the voice {job['voice']!r}\n")
            return 1
        if code != 0:
            sys.stderr.write(f"espeak-ng failed (code {code}) on {job['text']!r}\n")
            return 1
        results[f"a{i}"] = np.frombuffer(payload, dtype=np.int16)
    buffer = io.BytesIO()
    np.savez(buffer, **results)
    sys.stdout.buffer.write(buffer.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
