"""Built-in components: importing this package registers every kind in ``miras.registry``.

Memory axes (memory, bias, retention, learner) and model pieces (gates, attention, mixer, blocks, channel MLPs).
"""

from __future__ import annotations

from miras.components import attention, bias, blocks, gates, learner, memory, mixer, mlp, retention  # noqa: F401
