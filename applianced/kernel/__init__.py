"""The kernel side of the engine: a model of LIO configuration, the plan that moves the
kernel from one configuration to another, and the rtslib-fb backend that carries it out."""
