"""KFP v2 pipeline for the Gemma fine-tuning steps: definitions, local run, compile, submit, lineage.

Everything in this package imports kfp (and, for submit/lineage, google-cloud-aiplatform) but
never torch: compiling or submitting the pipeline must work on a laptop without the training
stack. The step logic lives in ``components``; the KFP components here only wire artifacts to it.
"""
