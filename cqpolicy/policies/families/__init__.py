"""One module per policy family; importing this package registers them all."""
from cqpolicy.policies.families import fora, none, peers  # noqa: F401
