"""The project's one version string: both distributions (the `magicface` library and
`magicface-server`), the client's User-Agent, the OpenAPI document, `/healthz` and the
images read it from here. Torch-free, so the gateway and the client can import it."""

__version__ = "0.2.0"
