"""The data layer: readers -> records -> validation -> webdataset shards -> loader batches.

Nothing here imports the model: images reach the model through the ``image_transform`` the
caller passes to ``make_loader``.
"""
