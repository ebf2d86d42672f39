@load ./threatbus
