"""`hetserve bench`: a load generator for the line protocol, with transformers `generate` beside it.

workload.py  what to send: prompts of a given token length or from a JSONL file (pure)
load.py      N concurrent clients sending them, timing every token (asyncio, the I/O edge)
baseline.py  the same requests through transformers `generate`, batched, timed the same way
stats.py     per-request timings -> tokens/s, requests/s, TTFT and TPOT percentiles (pure)
report.py    the table and the JSON document (pure)
run.py       the whole command: check the server, run the load, the baseline, the report
"""
