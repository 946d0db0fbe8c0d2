"""mtl_scale: multi-task LoRA fine-tuning of decoder LLMs on DeepSpeed ZeRO-3."""

__version__ = "0.6.6"
