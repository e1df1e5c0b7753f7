"""Frozen features of whole images, below both training and evaluation (docs/architecture.md).

``images``: network-input batches of a split's whole images and the backbone's pooled features
of them (``image_batches``, ``extract``, ``labeled_features``); ``maps``: stage-map features (each
stage max-pooled to 2x2, the Exemplar-CNN authors' pre-ReLU and SVM features).  The engine's kNN
monitor, the methods (Exemplar-CNN's clustering, InvP) and the evaluation protocols import them
from here; kNN classification of such features is ``fastssl.knn.classify``.
"""
