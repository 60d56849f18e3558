"""VNN-LIB properties in and out: read what a VNN-COMP benchmark states (:mod:`.read`), check it on a model (:mod:`.check`),
write what a repair proves (:mod:`.write`)."""

from cnnrepair.vnnlib.check import PropertyCheck, PropertySet, check_properties, property_boxes, property_set
from cnnrepair.vnnlib.read import OutputCase, VnnlibProperty, parse_vnnlib, read_instances, read_vnnlib
from cnnrepair.vnnlib.write import BallProperty, BoxProperty, check_timeout, write_boxes, write_properties

__all__ = ["BallProperty", "BoxProperty", "OutputCase", "PropertyCheck", "check_properties", "property_boxes", "property_set", "PropertySet", "VnnlibProperty", "check_timeout", "parse_vnnlib", "read_instances",
           "read_vnnlib", "write_boxes", "write_properties"]
