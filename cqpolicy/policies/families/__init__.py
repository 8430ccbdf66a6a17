"""One module per policy family; importing this package registers them all."""
from cqpolicy.policies.families import dps, fora, none, peers, recat  # noqa: F401
