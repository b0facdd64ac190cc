"""What services and clients use: the service SDK (`worker`) and the client SDK (`client`)."""
