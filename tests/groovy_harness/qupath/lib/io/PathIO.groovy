// Test stand-in for QuPath's qupath.lib.io.PathIO: reads names and classes from a GeoJSON file.
package qupath.lib.io

class PathIO {
    static List readObjects(File file) {
        def data = new groovy.json.JsonSlurper().parse(file)
        def features = data instanceof Map && data.type == 'FeatureCollection' ? data.features : data
        return features.collect { f ->
            def cls = f.properties?.classification?.name
            new FakeObject(name: f.properties?.name, pathClass: cls == null ? null : FakeClass.of(cls))
        }
    }
}
