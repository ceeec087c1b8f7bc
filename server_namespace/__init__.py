"""The MagicFace server as installed from the wheel: `magicface_server.service` (the
gateway) and `magicface_server.worker`, the repository's `service/` and `worker/`
folders under the distribution's own name."""
