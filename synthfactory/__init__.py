"""synthfactory: recipe -> generated shards -> validated, versioned release."""
