"""Training tooling: the `fpmgm-train` CLI (`train`), the shared Accelerate loop (`loop`), the objectives, trainer
state, run lock and trackers. Not shipped beside the weights; see docs/architecture.md."""
