"""Orchestration: the drivers above the protocol and the audits.

* :mod:`~secure_dfml.orchestration.peer` -- one real peer process;
* :mod:`~secure_dfml.orchestration.launch` -- the local launcher of all of them;
* :mod:`~secure_dfml.orchestration.tune` -- budget sweeps (the simulation at several budgets, each point audited);
* :mod:`~secure_dfml.orchestration.canary` -- the one-run canary audit (a federation trained with canaries).

The simulation driver itself is :func:`secure_dfml.run_federation`.  Nothing
below this package (protocol, crypto, privacy, audit) imports it.
"""
