"""Helpers below every layer, on the standard library only: safe names and paths (:mod:`.names`), and
the text the fronts share: byte sizes, k ranges, Markdown cells (:mod:`.fmt`)."""
