"""MDLM -> FP-MDLM conversion: checkpoint import (`mdlm_import`, `checkpoint_pickle`), layer mapping, distillation
and the `fpmgm-convert` CLI (`convert`). See docs/architecture.md and conversion/README.md."""
