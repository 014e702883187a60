"""The gateway: OpenAI-compatible, session-aware front door that routes each turn to the node
holding its prefix. Request path: api -> tenants -> sessions -> chat_template -> router ->
orchestrator -> responses. See docs/gateway.md."""
