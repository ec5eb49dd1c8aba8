"""The codec: adapters in, a SHARE state out, and back.

:mod:`.subspace` is the math on tensors (no I/O); :mod:`.compress` plans module groups and fits
them; :mod:`.build` turns opened adapters into a :class:`~.state.SHAREState`; :mod:`.edit` builds
the next state (add, remove, recompute); :mod:`.stats` derives statistics and sizes from a state.
"""
