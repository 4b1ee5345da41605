// Runs groovy/*.groovy against stand-ins for QuPath's project, entries and hierarchies (see
// tests/test_project_nojvm.py). Usage: groovy -cp tests/groovy_harness run.groovy <groovy dir> <work dir>
import groovy.json.JsonOutput
import qupath.lib.io.FakeClass
import qupath.lib.io.FakeObject

class Hier06 {  // QuPath 0.6: addObjects only
    List objs = []
    Collection getAnnotationObjects() { new ArrayList(objs) }
    void removeObjects(Collection c, boolean keepChildren) { objs.removeAll(c) }
    boolean addObjects(Collection c) { objs.addAll(c) }
}

class Hier04 {  // before 0.5: addPathObjects only
    List objs = []
    Collection getAnnotationObjects() { new ArrayList(objs) }
    void removeObjects(Collection c, boolean keepChildren) { objs.removeAll(c) }
    boolean addPathObjects(Collection c) { objs.addAll(c) }
}

class Data { def hierarchy }

class Entry {
    String imageName
    Data data
    int saves = 0
    Data readImageData() { data }
    def readHierarchy() { data.hierarchy }
    void saveImageData(Data d) { assert d.is(data); saves++ }
}

class Project {
    File file
    List imageList
    List pathClasses = []
    int syncs = 0
    java.nio.file.Path getPath() { file.toPath() }
    void setPathClasses(Collection c) { pathClasses = new ArrayList(c) }
    void syncChanges() { syncs++ }
}

def groovyDir = new File(args[0])
def work = new File(args[1])

def makeProject = { File dir, boolean oldApi ->
    dir.mkdirs()
    def hier = { -> oldApi ? new Hier04() : new Hier06() }
    def a = new Entry(imageName: 'slide a:1/2.svs', data: new Data(hierarchy: hier()))
    a.data.hierarchy.objs.addAll([new FakeObject(name: 'mine', pathClass: FakeClass.of('Tumor')),
                                  new FakeObject(name: 'pdseg old', pathClass: FakeClass.of('Tumor')),
                                  new FakeObject(name: null, pathClass: null)])
    // predictions written by pdseg: one as written, one the pathologist reclassified (both fingerprinted)
    def crc = new java.util.zip.CRC32()
    crc.update('Tumor'.getBytes('UTF-8'))
    def fp = ['pdseg: fingerprint': (double) (crc.getValue() & 0xFFFFFF), 'pdseg: written area px^2': 100.0d,
              'pdseg: written centroid x px': 5.0d, 'pdseg: written centroid y px': 5.0d]
    a.data.hierarchy.objs.addAll([new FakeObject(name: 'pdseg as written', pathClass: FakeClass.of('Tumor'), measurements: fp),
                                  new FakeObject(name: 'pdseg corrected', pathClass: FakeClass.of('Stroma'), measurements: fp)])
    def b = new Entry(imageName: 'b.png', data: new Data(hierarchy: hier()))
    b.data.hierarchy.objs.add(new FakeObject(name: 'pdseg keep: no file for b', pathClass: null))
    new Project(file: new File(dir, 'project.qpproj'), imageList: [a, b], pathClasses: [FakeClass.of('Tumor')])
}

def run = { String script, Project project, Entry current ->
    def exported = []
    def binding = new Binding()
    binding.setVariable('getProject', { -> project })
    binding.setVariable('getCurrentImageData', { -> current?.data })
    binding.setVariable('getProjectEntry', { -> current })
    binding.setVariable('exportObjectsToGeoJson', { objs, String path, String option ->
        assert option == 'FEATURE_COLLECTION'
        new File(path).text = JsonOutput.toJson([type: 'FeatureCollection', features: objs.collect {
            [type: 'Feature', properties: [name: it.name]] }])
        exported << new File(path).name
    })
    new GroovyShell(this.class.classLoader, binding).evaluate(new File(groovyDir, script))
    return exported
}

def state = { Project p -> [
    names: p.imageList.collect { e -> e.data.hierarchy.objs.collect { it.name } },
    saves: p.imageList.collect { it.saves },
    classes: p.pathClasses.collect { it.toString() },
    syncs: p.syncs,
] }

def results = [:]

// export: no image open -> every image; batch (an image current) -> that image only
def p1 = makeProject(new File(work, 'export-all'), false)
results.export_all = run('export_annotations.groovy', p1, null)
def p2 = makeProject(new File(work, 'export-one'), false)
results.export_one = run('export_annotations.groovy', p2, p2.imageList[1])
results.export_file = new File(work, 'export-all/pdseg/annotations/slide a_1_2.svs.geojson').text

// import into 0.6-style and pre-0.5-style hierarchies
['import06': false, 'import04': true].each { key, oldApi ->
    def p = makeProject(new File(work, key), oldApi)
    def pred = new File(work, "${key}/pdseg/predictions")
    pred.mkdirs()
    new File(pred, 'slide a_1_2.svs.geojson').text = JsonOutput.toJson([type: 'FeatureCollection', features: [
        [type: 'Feature', properties: [name: 'pdseg Tumor', classification: [name: 'Tumor']]],
        [type: 'Feature', properties: [classification: [name: 'Necrosis']]],
    ]])
    run('import_predictions.groovy', p, null)
    results[key] = state(p)
}
def p3 = makeProject(new File(work, 'import-batch'), false)
new File(work, 'import-batch/pdseg/predictions').mkdirs()
new File(work, 'import-batch/pdseg/predictions/b.png.geojson').text = '[]'
run('import_predictions.groovy', p3, p3.imageList[1])
results.import_batch = state(p3)

println 'RESULT ' + JsonOutput.toJson(results)
