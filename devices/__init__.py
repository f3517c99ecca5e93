"""devices: device logic only (features, config space, request semantics, backing store).
Workers come from cython_ext; the protocol and sockets from vhost."""
