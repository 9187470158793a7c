"""The reference model: the ``Reference`` object a module holds and asks (``reference``), its spec and modes
(``spec``), the precomputed log-prob cache (``cache``), TR-DPO sync (``sync``) and the record an export keeps of
it (``record``).
"""
