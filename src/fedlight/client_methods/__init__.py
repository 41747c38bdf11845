"""Client methods: changes to local training (objective terms, gradient corrections) such as FedProx and SCAFFOLD."""
