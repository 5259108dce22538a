"""The gateway's Triton side: tensors for one request, the ensemble's plan, the gRPC client, its errors."""
