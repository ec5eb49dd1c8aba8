"""Rebuilt adapters at work: loaded into PEFT models (:mod:`.peftload`), written as PEFT folders for
inference engines (:mod:`.export`), served in mixed batches over one snapshot (:mod:`.serve`), and
resolved by name inside vLLM (:mod:`.cache`, :mod:`.vllm_plugin`)."""
