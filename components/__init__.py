"""Gemma 4 image-classification fine-tuning: one module per pipeline step.

Step modules (stage_weights, prepare_dataset, finetune, evaluate, merge_export) each hold a
typed config dataclass, a pure ``run(config)`` working on local paths, and a CLI ``main()``.
They never import kfp: the KFP wrappers in ``pipelines/`` call into them.
"""

__version__ = "0.1.0"
