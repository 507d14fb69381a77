"""The pprof profile.proto schema (github.com/google/pprof, proto/profile.proto), the fields pooltrace
writes, built as a protobuf descriptor so tests decode pooltrace's pprof output with the real library."""

from __future__ import annotations

import gzip


def profile_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="profile.proto", package="perftools.profiles", syntax="proto3")

    def msg(name, *fields):
        m = fdp.message_type.add(name=name)
        for num, fname, typ, label, type_name in fields:
            f = m.field.add(name=fname, number=num, type=typ, label=label)
            if type_name:
                f.type_name = type_name

    T = L = descriptor_pb2.FieldDescriptorProto
    rep, opt = L.LABEL_REPEATED, L.LABEL_OPTIONAL
    msg("ValueType", (1, "type", T.TYPE_INT64, opt, None), (2, "unit", T.TYPE_INT64, opt, None))
    msg("Label", (1, "key", T.TYPE_INT64, opt, None), (2, "str", T.TYPE_INT64, opt, None),
        (3, "num", T.TYPE_INT64, opt, None))
    msg("Sample", (1, "location_id", T.TYPE_UINT64, rep, None), (2, "value", T.TYPE_INT64, rep, None),
        (3, "label", T.TYPE_MESSAGE, rep, ".perftools.profiles.Label"))
    msg("Mapping", (1, "id", T.TYPE_UINT64, opt, None), (2, "memory_start", T.TYPE_UINT64, opt, None),
        (3, "memory_limit", T.TYPE_UINT64, opt, None), (4, "file_offset", T.TYPE_UINT64, opt, None),
        (5, "filename", T.TYPE_INT64, opt, None), (6, "build_id", T.TYPE_INT64, opt, None),
        (7, "has_functions", T.TYPE_BOOL, opt, None))
    msg("Line", (1, "function_id", T.TYPE_UINT64, opt, None), (2, "line", T.TYPE_INT64, opt, None))
    msg("Location", (1, "id", T.TYPE_UINT64, opt, None), (2, "mapping_id", T.TYPE_UINT64, opt, None),
        (3, "address", T.TYPE_UINT64, opt, None), (4, "line", T.TYPE_MESSAGE, rep, ".perftools.profiles.Line"))
    msg("Function", (1, "id", T.TYPE_UINT64, opt, None), (2, "name", T.TYPE_INT64, opt, None),
        (3, "system_name", T.TYPE_INT64, opt, None), (4, "filename", T.TYPE_INT64, opt, None))
    msg("Profile", (1, "sample_type", T.TYPE_MESSAGE, rep, ".perftools.profiles.ValueType"),
        (2, "sample", T.TYPE_MESSAGE, rep, ".perftools.profiles.Sample"),
        (3, "mapping", T.TYPE_MESSAGE, rep, ".perftools.profiles.Mapping"),
        (4, "location", T.TYPE_MESSAGE, rep, ".perftools.profiles.Location"),
        (5, "function", T.TYPE_MESSAGE, rep, ".perftools.profiles.Function"),
        (6, "string_table", T.TYPE_STRING, rep, None), (10, "duration_nanos", T.TYPE_INT64, opt, None),
        (14, "default_sample_type", T.TYPE_INT64, opt, None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("perftools.profiles.Profile"))


def read_profile(data: bytes):
    p = profile_class()()
    p.ParseFromString(gzip.decompress(data))
    return p
