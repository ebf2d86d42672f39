"""The RabbitMQ backbone: Threat Bus nodes share intel through one fanout exchange."""

from threatbus_rabbitmq.plugin import RabbitMQBackbone

__all__ = ["RabbitMQBackbone"]
