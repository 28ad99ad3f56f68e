"""The kernel side of the engine: a model of LIO configuration, the plan that moves the
kernel from one configuration to another, the plain configfs reads that observe it, and
the rtslib-fb backend that carries the plan out."""
