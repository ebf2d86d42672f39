"""Threat Bus app plugin for ZeroMQ: any app joins the bus over the ZeroMQ
protocol of the original Threat Bus (manage, pub and sub endpoints)."""

from threatbus_zmq.plugin import ZmqApp

__all__ = ["ZmqApp"]
