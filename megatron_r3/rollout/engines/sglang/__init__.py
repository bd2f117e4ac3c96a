"""The SGLang rollout engine: the engine (`engine`), its flags (`config`), the HTTP client to the servers (`http`:
health, retries, server facts), the wire format (`protocol`), the route codec (`codec`) and the weight sync
(`weight_sync`). Import order runs one way: codec < protocol < http < weight_sync < engine."""
