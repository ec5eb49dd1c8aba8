"""The SHARE format on disk: strict bounded reads, deterministic atomic writes, storage schemes, and
the validated values saved whole (a LoRA config's rules, the compression spec, ``share_config.json``).

Modules, from the bytes up: :mod:`.jsonfile` and :mod:`.tensorfile` (bounded parsing and
deterministic writing), :mod:`.atomic` (saves that replace only what lorashare wrote),
:mod:`.storage` (float, int8 and nf4 storage and its byte cost), :mod:`.loraconfig` (what a PEFT
``adapter_config.json`` must hold), :mod:`.spec` (the compression spec), :mod:`.schema`
(``share_config.json``) and :mod:`.checkpoint` (the checkpoint folder, checked field by field).
"""
