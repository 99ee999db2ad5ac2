"""HTTP surface: routes, response schemas, problem+json, API keys, request limits."""
