"""Training-framework callbacks around `deadrelu_cli.watch` (each imports its framework only when used):

- `deadrelu_cli.integrations.lightning.DeadReluCallback` (pip install 'deadrelu[lightning]')
- `deadrelu_cli.integrations.hf_trainer.DeadReluCallback` (pip install 'deadrelu[transformers]')
"""
