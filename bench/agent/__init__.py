"""`agentkv bench agent`: agent traffic against agentkv's routing and P/D modes and a real peer.

workload (what is sent) -> driver (how it is sent and timed) -> metrics (what it means) ->
report (JSON, table, plots); modes names the systems under test (agentkv.stack starts them); run
ties them together.
"""
