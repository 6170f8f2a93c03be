"""The VMManager service: deploys and controls VMs on one node through its VMM."""
