"""One module per policy family; importing this package registers them all."""
from cqpolicy.policies.families import (  # noqa: F401
    deepcache,
    dps,
    dqar,
    forecast,
    fora,
    learned,
    none,
    peers,
    phased,
    recat,
    schedule,
    smoothcache,
    table,
    taylorseer,
    teacache,
    tgate,
)
