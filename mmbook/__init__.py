"""mmbook: the companion package of *Large Language Models, from Theory to Practice*.

Each module holds one concept of the book. Code that a chapter, a test or a reader reuses
lives here once; the chapter notebooks import it, show it with :func:`mmbook.show` and
verify it against independent references.
"""

from mmbook.core import Source, get_device, numpy_rng, python_rng, seed, seed_shift, set_seed, show, torch_generator

__version__ = "0.1.0"

__all__ = [
    "Source", "__version__", "get_device", "numpy_rng", "python_rng", "seed", "seed_shift", "set_seed", "show",
    "torch_generator",
]
