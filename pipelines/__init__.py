"""The Kubeflow pipelines `cascade-mask-rcnn-training` and `cascade-mask-rcnn-retraining`, and
their command line.

- training.py: the training graph (`build_pipeline`), compile options, `compile_pipeline`;
- retraining.py: the retraining graph for schedules (train when the data changed, promote when better);
- params.py: run parameters, checks and cron conversion (nothing is submitted until they pass);
- submit.py: runs and recurring runs through kfp.Client;
- run_local.py: either pipeline on this machine with kfp.local;
- cli.py: `python -m pipelines compile | submit | schedule | run-local`.
"""
