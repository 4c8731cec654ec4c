import numpy as np
import pytest
import torch

from mmbook.data import (
    ANSWERS,
    DIGIT_WORDS,
    QUESTION_KINDS,
    Scene,
    ShapeObject,
    WordVocab,
    audio_visual_digits,
    caption_truth,
    describe_scene,
    render_scene,
    scene_questions,
    shapes_scenes,
    spoken_digit_recordings,
)
from mmbook.speech import VOICE_VARIANTS


def test_shapes_scenes_deterministic_and_consistent():
    a, b = shapes_scenes(50, seed=3), shapes_scenes(50, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.questions == b.questions
    assert not torch.equal(a.images, shapes_scenes(50, seed=4).images)
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    for i in range(len(a)):
        objs = a.scenes[i].objects
        assert len({(o.shape, o.colour) for o in objs}) == len(objs)
        assert len({(o.row, o.col) for o in objs}) == len(objs)
        for question, answer, kind in a.questions[i]:
            assert kind in QUESTION_KINDS and answer in ANSWERS
            if kind == "count" and question == "how many shapes are there?":
                assert answer == ("zero", "one", "two", "three")[len(objs)]
            if kind == "colour":
                shape = question.split()[-1].rstrip("?")
                assert [o.colour for o in objs if o.shape == shape] == [answer]


def test_caption_and_relation_semantics():
    scene = Scene([ShapeObject("circle", "red", 0, 1), ShapeObject("square", "blue", 2, 1)], grid=3)
    assert describe_scene(scene) == "a red circle above a blue square"
    rng = np.random.default_rng(0)
    for _ in range(20):
        for question, answer, kind in scene_questions(scene, rng):
            if kind == "relation":
                truth = ("red circle above" in question or "blue square below" in question)
                assert (answer == "yes") == truth, question


def test_render_draws_the_colours():
    scene = Scene([ShapeObject("square", "green", 1, 1)], grid=3)
    img = render_scene(scene, 32)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert tuple(img[:, 16, 16].tolist()) == (40, 160, 60)
    assert tuple(img[:, 1, 1].tolist()) == (235, 235, 235)


def test_qa_pairs_and_bad_input():
    ds = shapes_scenes(10, seed=0)
    assert all(k == "count" for *_, k in ds.qa_pairs(["count"]))
    with pytest.raises(ValueError, match="unknown kinds"):
        ds.qa_pairs(["size"])
    with pytest.raises(ValueError, match=r"max_objects must be an int in \[4, 9\], got 2"):
        shapes_scenes(5, min_objects=4, max_objects=2)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        shapes_scenes(5.0)
    with pytest.raises(IndexError, match="out of range"):
        ds[10]
    with pytest.raises(ValueError, match="scene objects must be ShapeObjects with a shape in"):
        render_scene(Scene([ShapeObject("star", "red", 0, 0)], grid=3))


def test_audio_visual_digits_alignment_and_disjoint_recordings():
    train = audio_visual_digits("train", recordings_per_digit=8)
    test = audio_visual_digits("test", recordings_per_digit=8)
    assert len(train) + len(test) == 1797
    assert not set(train.recording_index.tolist()) & set(test.recording_index.tolist())
    rec_labels = torch.arange(10).repeat_interleave(8)
    assert torch.equal(rec_labels[train.recording_index], train.labels)
    item = train[5]
    assert item["image"].shape == (1, 8, 8) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["waveform"].shape == (16000,) and item["word"] == DIGIT_WORDS[int(item["label"])]
    assert torch.equal(train[5]["waveform"], audio_visual_digits("train", recordings_per_digit=8)[5]["waveform"])
    clean = audio_visual_digits("train", recordings_per_digit=8, snr_db=None)
    assert torch.equal(clean[5]["waveform"], clean.recordings[clean.recording_index[5]])


def test_audio_visual_digits_held_out_voices():
    # with 8 recordings per digit, recording i of digit d is spoken by VOICE_VARIANTS[(i + d) % 17]: m1 speaks a 0,
    # f2 the digits 1-8 and f5 a 9, so these three voices give every digit a test recording
    held = ["m1", "f2", "f5"]
    train = audio_visual_digits("train", recordings_per_digit=8, held_out_voices=held)
    test = audio_visual_digits("test", recordings_per_digit=8, held_out_voices=held)
    voices = [(i + d) % 17 for d in range(10) for i in range(8)]
    names = [VOICE_VARIANTS[v] for v in voices]
    train_voices = {names[r] for r in train.recording_index.tolist()}
    test_voices = {names[r] for r in test.recording_index.tolist()}
    assert test_voices <= set(held) and not train_voices & set(held) and test_voices
    rec_labels = torch.arange(10).repeat_interleave(8)
    assert torch.equal(rec_labels[test.recording_index], test.labels)
    assert torch.equal(rec_labels[train.recording_index], train.labels)
    # the images are split as without held-out voices; only the recordings paired with them change
    assert torch.equal(test.labels, audio_visual_digits("test", recordings_per_digit=8).labels)


def test_audio_visual_digits_bad_input():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        audio_visual_digits("val")
    with pytest.raises(ValueError, match="snr_db must be None or a"):
        audio_visual_digits("train", snr_db=(30.0, 10.0))
    with pytest.raises(ValueError, match="test_fraction"):
        audio_visual_digits("train", test_fraction=0.9)
    with pytest.raises(TypeError, match="held_out_voices must be None or a non-empty sequence"):
        audio_visual_digits("test", held_out_voices="whisper")
    with pytest.raises(ValueError, match=r"held_out_voices must be distinct names from .*got \['alto'\]"):
        audio_visual_digits("test", held_out_voices=["alto"])
    with pytest.raises(ValueError, match="held_out_voices must be distinct"):
        audio_visual_digits("test", held_out_voices=["m1", "m1"])
    with pytest.raises(ValueError, match="no recording of digit 0 is in the test voices"):
        audio_visual_digits("test", recordings_per_digit=8, held_out_voices=["whisper"])


def test_word_vocab_round_trip_and_padding():
    ds = shapes_scenes(30, seed=1)
    texts = ds.captions + [q for qs in ds.questions for q, _, _ in qs]
    vocab = WordVocab(texts)
    assert vocab.itos[:4] == list(WordVocab.SPECIALS) and vocab.itos[4:] == sorted(vocab.itos[4:])
    assert vocab.itos == WordVocab(list(reversed(texts))).itos
    for t in texts[:20]:
        assert vocab.decode(vocab.encode(t, bos=True, eos=True)) == t
    ids, lengths = vocab.encode_batch(["a red circle", "is there a blue square?"], eos=True)
    assert ids.shape == (2, 7) and lengths.tolist() == [4, 7] and ids[0, 4:].tolist() == [0, 0, 0]
    assert vocab.encode("a zebra")[1] == WordVocab.UNK
    assert vocab.encode_batch(["a red circle"], max_len=2)[0].shape == (1, 2)


def test_word_vocab_bad_input():
    vocab = WordVocab(["a red circle"])
    with pytest.raises(TypeError, match="texts must be a sequence of strings, got str"):
        WordVocab("a red circle")
    with pytest.raises(ValueError, match="id 99 out of range"):
        vocab.decode([99])
    with pytest.raises(TypeError, match="not one string"):
        vocab.encode_batch("a red circle")


def test_nan_noise_bounds_and_silent_conversions_are_refused():
    with pytest.raises(ValueError, match=r"audio_visual_digits: snr_db\[0\] must be a finite number"):
        audio_visual_digits(snr_db=(float("nan"), 10.0))  # NaN ratios meant clean audio
    with pytest.raises(TypeError, match="audio_visual_digits: snr_db must be None or a \\(low, high\\) pair"):
        audio_visual_digits(snr_db=10)
    with pytest.raises(TypeError, match="spoken_digit_recordings: duration must be a number, got bool"):
        spoken_digit_recordings(duration=True)
    ds = audio_visual_digits("test", recordings_per_digit=8)  # the recordings the other tests synthesise
    assert torch.equal(ds.waveform(-1), ds.waveform(len(ds) - 1))  # one item, one noise draw
    assert torch.equal(ds[-1]["waveform"], ds.waveform(len(ds) - 1))
    vocab = WordVocab(["a red circle"])
    with pytest.raises(TypeError, match="WordVocab.decode: ids must be ints, got float"):
        vocab.decode([4.7])  # was word 4
    with pytest.raises(TypeError, match="WordVocab.encode: bos must be True or False, got str"):
        vocab.encode("a", bos="no")
    off_grid = Scene([ShapeObject("circle", "red", 5, 0)], grid=3)
    with pytest.raises(ValueError, match="render_scene: scene objects must be"):
        render_scene(off_grid)  # drew nothing
    with pytest.raises(TypeError, match="describe_scene: scene must be a Scene, got int"):
        describe_scene(3)
    with pytest.raises(TypeError, match="scene_questions: rng must be a numpy Generator, got NoneType"):
        scene_questions(Scene([ShapeObject("circle", "red", 0, 0)], grid=3), None)
    with pytest.raises(TypeError, match="qa_pairs: kinds must be a sequence of kinds"):
        shapes_scenes(2).qa_pairs("colour")


def test_caption_truth_against_the_grid():
    circle_above_left = Scene([ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 1, 2)], grid=3)
    circle_below = Scene([ShapeObject("circle", "red", 2, 1), ShapeObject("square", "blue", 0, 1)], grid=3)
    captions = ["a red circle above a blue square", "a red circle left of a blue square",
                "a blue square right of a red circle", "a blue square below a red circle",
                "a red circle below a blue square", "a red circle right of a blue square", "a red circle",
                "a green circle", "a red circle above a red circle", "a blue square above a red circle"]
    truth = caption_truth([circle_above_left, circle_below], captions)
    assert truth.dtype == torch.bool and truth.shape == (2, 10)
    assert truth[0].tolist() == [True, True, True, True, False, False, True, False, False, False]
    assert truth[1].tolist() == [False, False, False, False, True, False, True, False, False, True]
    three = Scene([ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 1, 0),
                   ShapeObject("triangle", "green", 2, 2)], grid=3)
    extras = ["a red circle above a blue square and a green triangle",
              "a red circle above a blue square and a yellow triangle"]
    assert caption_truth([three], extras).tolist() == [[True, False]]
    scenes = shapes_scenes(60, seed=7, min_objects=1, max_objects=3)
    full = caption_truth(scenes.scenes, scenes.captions)
    assert full.diagonal().all()  # every generated caption is true of its own scene
    same = torch.tensor([[a == b for b in scenes.captions] for a in scenes.captions])
    assert not (same & ~full).any()  # identical captions are true of each other's scenes
    assert caption_truth(scenes.scenes[:2], []).shape == (2, 0)


def test_caption_truth_rejects_bad_input():
    scene = Scene([ShapeObject("circle", "red", 0, 0)], grid=3)
    with pytest.raises(ValueError, match="caption_truth: captions must look like"):
        caption_truth([scene], ["a red circle beside a blue square"])
    with pytest.raises(ValueError, match="caption_truth: captions must look like"):
        caption_truth([scene], ["a pink circle"])
    with pytest.raises(TypeError, match="caption_truth: captions must be a str"):
        caption_truth([scene], [3])
    with pytest.raises(TypeError, match="caption_truth: captions must be a sequence"):
        caption_truth([scene], "a red circle")
    with pytest.raises(TypeError, match="caption_truth: scene must be a Scene"):
        caption_truth(["a red circle"], ["a red circle"])
