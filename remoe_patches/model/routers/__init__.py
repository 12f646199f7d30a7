"""The routers for megatron-core's ``MoESubmodules.router`` slot (and Lory's MLP), one module per
router kind."""
