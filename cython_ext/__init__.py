"""cython_ext: the compiled hot loops (virtqueue engine, blk worker).  No Python object is made
per request here; Python only configures, starts and stops workers."""
