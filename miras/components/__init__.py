"""Built-in components: importing this package registers every kind in ``miras.registry``.

Memory axes (memory, bias, retention, learner) and model pieces (gates, attention, mixer, blocks, channel MLPs).
"""

from __future__ import annotations

from miras.components import attention, bias, blocks, gates, learner, memory, mixer, mlp, retention  # noqa: F401

# isort: split
from miras.components import msssm, trellis  # noqa: F401  (block kinds trellis, msssm)

# isort: split
from miras.components import cms, selfmod  # noqa: F401, I001  (hope: CMS channel mixer, selfmod block)

# isort: split
from miras.components import feature_maps  # noqa: F401, I001  (feature maps: identity, polynomial, exponential)
