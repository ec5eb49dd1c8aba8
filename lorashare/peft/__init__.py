"""PEFT adapters in: folders and Hub ids opened lazily (config and header first), validated, named and
fingerprinted; and rebuilt adapters written back out as standard PEFT folders (:mod:`.adapters`)."""
