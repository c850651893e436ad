"""The distributed shell: Ray device actors, the Ray Serve edge with batched verification, and ``covspec run``.

Nothing here decides tokens: the actors wrap the same ``Device`` and ``Edge`` objects as the in-process engine
(``covspec.runtime``). See docs/cluster.md.
"""
