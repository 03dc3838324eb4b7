"""The Kubeflow pipeline `cascade-mask-rcnn-training` and its command line.

- training.py: the pipeline graph (`build_pipeline`), compile options, `compile_pipeline`;
- params.py: run parameters, checks and cron conversion (nothing is submitted until they pass);
- submit.py: runs and recurring runs through kfp.Client;
- run_local.py: the whole pipeline on this machine with kfp.local;
- cli.py: `python -m pipelines compile | submit | schedule | run-local`.
"""
