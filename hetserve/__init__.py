"""hetserve: serve one large decoder-only LLM across a heterogeneous set of hosts."""

__version__ = "0.1.0"
