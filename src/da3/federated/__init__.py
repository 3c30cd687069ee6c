"""A fleet learns a domain together, the images never leaving each device (DESIGN.md §8).

Every device holds the frozen backbone already; what it trains and what travels is the
domain's own state (adaptor, gates, head: a few hundred KiB for DA3). A server averages the
states the devices send back, weighted by their number of images (FedAvg), on Flower
(``flwr``):

* :mod:`da3.federated.client`: the ClientApp (``client_app``): a device trains its local
  epochs with the library's own loop and replies with its new state;
* :mod:`da3.federated.server`: the ServerApp (``server_app``, and :func:`serve`): Flower's
  FedAvg, the traffic counted, the global domain evaluated on test after each round, an
  ordinary domain file saved at the end;
* :mod:`da3.federated.run`: :func:`federate`, both in Flower's simulation engine on one
  machine (``da3 federate``);
* :mod:`da3.federated.partition`: how a domain's training split is shared by simulated
  devices (``iid``, ``by-class[:K]``, ``dirichlet:ALPHA``);
* :mod:`da3.federated.deploy`: the same apps as separate Flower processes (SuperLink,
  SuperNodes, ``flwr run``).

Importing this package imports Flower; ``import da3`` does not.
"""

from da3.federated.partition import Partition, parse_partition, partition_indices
from da3.federated.run import FederatedDomain, federate
from da3.federated.settings import FederateSettings

__all__ = [
    "FederateSettings",
    "FederatedDomain",
    "Partition",
    "federate",
    "parse_partition",
    "partition_indices",
]
