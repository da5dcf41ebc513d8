"""New adapters from existing ones or from words: weighted combinations, the adapter library,
LoraHub, Text-to-LoRA; and the task collections they are built and measured on (``tasks``)."""
