"""Layer 4, the pipeline core: the merge state every pass reads and writes
(:class:`~hmir.pipeline.state.MergeState`), the pass interface and pass manager
(:mod:`~hmir.pipeline.manager`), the registry of merge methods (:mod:`~hmir.pipeline.methods`),
calibration data and the report. Passes (layer 5) build on it; :func:`hmir.compile_merge`
(layer 6) assembles a pipeline from it.

Example::

    >>> from hmir.pipeline.data import Calibration
    >>> Calibration.__module__
    'hmir.pipeline.data'
"""
