"""Lean HUSE runtime: standard library, numpy and Pillow at import; backends load lazily.

    from huse.runtime import Classifier
    clf = Classifier("bundle/")
    clf.classify(images=["shoe.jpg"], titles=["Leather ankle boots"])
"""

from huse.runtime.backends.onnxrt.runner import share_threads
from huse.runtime.classifier import Classifier, Embeddings
from huse.runtime.errors import HuseError
from huse.runtime.index import Hit, Index

__all__ = ["Classifier", "Embeddings", "Hit", "HuseError", "Index", "share_threads"]
