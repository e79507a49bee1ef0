"""The shipped control plane: delta-xDS server and CA, fed by a mesh file."""
